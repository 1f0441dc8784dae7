"""Attention and additive MIL against peers doing the same work: torchmil, MONAI, plain torch; JSON lines.

    python bench/bench_mil_peers.py [--device cuda] [--repeats 5] [--threads 1] [--sizes 1000 10000]
    python bench/bench_mil_peers.py --measure time --families abmil   # some rows only

Models: attention MIL (Ilse, Tomczak & Welling, "Attention-based Deep Multiple Instance Learning",
ICML 2018) and additive MIL (Javed et al., "Additive MIL: Intrinsically Interpretable Multiple
Instance Learning for Pathology", NeurIPS 2022). Peers: torchmil's ``ABMIL`` (Castro-Macías et
al., torchmil 1.x; ``pip install torchmil``) and MONAI's ``MILModel(mil_mode="att")`` head. Every
peer is built with the same network as ours and reads our weights: each row's ``matched_max_abs_diff``
is the largest difference of their logits from ours on the benchmark's bag (nonzero only by float
rounding); a benchmark whose networks differ more than ``MATCH_TOL`` stops with an error.

The network (D = 512 features, embedding width F = 128, attention width A = 128; one bag of N
instances, N = 1k, 10k, 100k, 1M; float32):

- ``h = ReLU(W x + b)`` (F), attention ``w^T (tanh(V h) * sigmoid(U h))`` (gated) or
  ``w^T tanh(V h)``, softmax over the bag, classifier on ``z = sum_n attn_n h_n``.
- torchmil: ``ABMIL(att_dim=A, gated=True, feat_ext=<the embedding>)``. Differs: its classifier
  gives one logit (ours two; the same (F,)-vector product per bag) and its ``w`` has no bias.
- MONAI: ``MILModel`` hard-codes ``Linear(D, 2048)`` attention and has no gating, so its
  ``attention`` is replaced by ``Linear(F, A) -> Tanh -> Linear(A, 1)`` and it is compared with our
  *ungated* model; the embedding is its ``backbone`` (``net``). Its ``forward`` reshapes the bag
  into images for a CNN, so ``calc_head(net(feats))`` is timed: the same two calls without the reshape.
- additive MIL has no packaged peer: the reference is the same network written plainly in torch
  (``nn.Sequential`` blocks, the whole bag at once, ``V`` and ``U`` as two ``Linear``), computing
  ``attn_n * psi(h_n)`` like ours (Javed et al.'s ``psi(attn_n h_n)`` is the same number for a
  bias-free ReLU ``psi``).

Ours, in three configurations per comparison:

- *matched* (``ours configured to theirs``): ``quantities=()`` (no area head), ``bag_context=False``
  (no score offset, no bag prior), ``dropout=0``, a linear classifier for ABMIL
  (``classifier_hidden=0``), the peer's gating. The same arithmetic as the peer.
- *unchecked*: matched, with what the peers omit omitted too: the input checks of
  ``checked_bag`` (layout, dtype, the mask, and one ``aminmax`` pass over the (B, N, D) features
  that refuses NaN and Inf). Neither peer checks its input; MONAI takes no mask at all, torchmil
  builds a float mask of ones when given none.
- *registered*: ``abmil_features`` / ``additive_mil_features`` as registered, against the peer
  configured to its D, F, A and gating. Ours does more: the tumour-area head (a linear score of
  every instance's features, the bag prior from the quantiles of those scores: a sort over N, the
  calibration), the attention score offset, dropout 0.25 in training, and for ABMIL a classifier
  MLP (F -> 64 -> 2).

Rows (value = ours / theirs; target <= 1.0 each; ``cpu_value``: the same from process-time medians):

- ``mil_peers_<mode>_<N>_<comparison>``: median time of one step, ``mode`` = ``fwdbwd`` (train
  mode, ``logits.sum().backward()``, gradients cleared each step) or ``eval`` (eval mode, no
  autograd). Each comparison interleaves its two steps in one process (``_common.compare``, after
  one untimed call each), at least ``--repeats`` times and until about ``MIN_TIMED_S`` seconds
  (``repeats`` in the row); see :func:`pair_timings` for why pairs. Comparisons: ``torchmil_gated``,
  ``torchmil_gated_unchecked``, ``abmil_registered_vs_torchmil_gated``, ``monai_att``,
  ``monai_att_unchecked``, ``additive_reference``, ``additive_reference_unchecked``,
  ``additive_registered_vs_reference``.
- ``mil_peers_memory_<mode>_<N>_<comparison>``: peak memory of one step, each model in a fresh
  subprocess (``_common.MemoryProbe``, created after one step on a ``WARMUP_BAG``-instance bag so
  that one-time allocations of a first call are not counted; the input features are counted),
  ours / theirs; ``ours_mb``, ``theirs_mb`` in the row (MB = 2**20 bytes). Input checks allocate
  nothing, so there is no unchecked memory row.

On CPU, N = 1M is measured in eval mode only (``FWDBWD_MAX_CPU``): one forward + backward of the
1M bag takes 6 s or more per candidate, so the eight comparisons would take well over ten minutes.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from typing import Any, Callable

import torch
from torch import nn

from _common import (MemoryProbe, Timing, add_common_args, compare, emit, guarded, machine, missing_row, ratio_row,
                     run_worker, setup, time_fn, worker_result)

SIZES = (1_000, 10_000, 100_000, 1_000_000)
FWDBWD_MAX_CPU = 100_000  # larger bags are measured in eval mode only on CPU (see the docstring)
DIM, HIDDEN, ATTENTION, CLASSIFIER_HIDDEN = 512, 128, 128, 64
MIN_TIMED_S = 2.0  # seconds of timed steps per comparison at least: medians of 1 ms steps are noisy
MAX_REPEATS = 100
MATCH_TOL = 1e-3  # logits of ours and a peer with the same weights; float32 rounding over 1M instances stays far below
MB = 2**20
WARMUP_BAG = 64  # instances of the bag each memory worker runs once before its probe

# comparison -> (our candidate, their candidate, what the row's note says was matched)
_MATCHED = "D, F, A, gating and weights identical"
ABMIL_ROWS: dict[str, tuple[str, str, str]] = {
    "torchmil_gated": ("ours_gated", "torchmil_gated",
                       f"ours configured to theirs (gated, no area head, no bag context, linear classifier); {_MATCHED}; "
                       "theirs: 1 logit and a bias-free attention output"),
    "torchmil_gated_unchecked": ("ours_gated_unchecked", "torchmil_gated",
                                 "as torchmil_gated, ours without the input checks torchmil omits "
                                 "(layout, dtype, mask, NaN/Inf aminmax pass)"),
    "abmil_registered_vs_torchmil_gated": ("ours_registered", "torchmil_gated",
                                           "abmil_features as registered vs torchmil configured to its D, F, A, gating; "
                                           "ours also computes the area head with bag prior, the score offset, a "
                                           "classifier MLP and dropout (training)"),
    "monai_att": ("ours_plain", "monai_att",
                  f"ours ungated, configured to theirs; MONAI cannot gate and hard-codes 2048 attention units, "
                  f"its attention replaced by Linear(F, A)-Tanh-Linear(A, 1); {_MATCHED}; theirs takes no mask"),
    "monai_att_unchecked": ("ours_plain_unchecked", "monai_att",
                            "as monai_att, ours without the input checks MONAI omits "
                            "(layout, dtype, mask, NaN/Inf aminmax pass)"),
}
ADDITIVE_ROWS: dict[str, tuple[str, str, str]] = {
    "additive_reference": ("ours_additive", "reference_additive",
                           f"no packaged peer: the same network in plain torch (nn.Sequential, whole bag at once); "
                           f"ours without area head, bag context, dropout; {_MATCHED}"),
    "additive_reference_unchecked": ("ours_additive_unchecked", "reference_additive",
                                     "as additive_reference, ours without the input checks the reference omits "
                                     "(layout, dtype, mask, NaN/Inf aminmax pass)"),
    "additive_registered_vs_reference": ("ours_additive_registered", "reference_additive",
                                         "additive_mil_features as registered vs the plain-torch reference; ours "
                                         "also computes the area head with bag prior, the score offset and dropout "
                                         "(training)"),
}
# candidates whose peak memory is measured (input checks allocate nothing: no unchecked workers)
MEMORY_ROWS: dict[str, tuple[str, str]] = {
    "torchmil_gated": ("ours_gated", "torchmil_gated"),
    "abmil_registered_vs_torchmil_gated": ("ours_registered", "torchmil_gated"),
    "monai_att": ("ours_plain", "monai_att"),
    "additive_reference": ("ours_additive", "reference_additive"),
    "additive_registered_vs_reference": ("ours_additive_registered", "reference_additive"),
}


# ------------------------------------------------------------------------------------------------
# the candidates
# ------------------------------------------------------------------------------------------------
class AdditiveReference(nn.Module):
    """Additive MIL (Javed et al., NeurIPS 2022) written plainly: gated attention, ``attn_n * psi(h_n)``.

    Args:
        dim: instance feature width D.
        hidden: embedding width F.
        attention: attention width A.
        classifier_hidden: hidden width of the bias-free MLP ``psi``.
        classes: number of logits C.
    """

    def __init__(self, dim: int, hidden: int, attention: int, classifier_hidden: int, classes: int) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU())
        self.attention_v = nn.Sequential(nn.Linear(hidden, attention), nn.Tanh())
        self.attention_u = nn.Sequential(nn.Linear(hidden, attention), nn.Sigmoid())
        self.attention_w = nn.Linear(attention, 1)
        self.psi = nn.Sequential(nn.Linear(hidden, classifier_hidden, bias=False), nn.ReLU(),
                                 nn.Linear(classifier_hidden, classes, bias=False))
        self.bias = nn.Parameter(torch.zeros(classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D) features -> (B, C) logits."""
        h = self.embed(x)  # (B, N, F)
        attn = self.attention_w(self.attention_v(h) * self.attention_u(h)).softmax(1)  # (B, N, 1)
        return (attn * self.psi(h)).sum(1) + self.bias  # (B, C)


def _ours(family: str, registered: bool, gated: bool = True) -> Any:
    from mlmi_zoo import create_model

    if registered:
        return create_model(family, in_features=DIM, hidden=HIDDEN, attention_hidden=ATTENTION)
    extra = {"classifier_hidden": 0} if family == "abmil_features" else {"classifier_hidden": CLASSIFIER_HIDDEN}
    return create_model(family, in_features=DIM, hidden=HIDDEN, attention_hidden=ATTENTION, gated=gated, dropout=0.0,
                        quantities=(), bag_context=False, **extra)


def _without_input_checks(model: Any) -> Any:
    """``model`` whose ``forward_bag`` skips ``checked_bag`` (what the peers omit); the mask is all valid."""
    if not callable(getattr(model, "checked_bag", None)):
        raise AttributeError(f"{type(model).__name__} has no checked_bag(feats, mask); the unchecked rows need it")

    def unchecked(feats: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return feats, torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device)

    model.checked_bag = unchecked  # an instance attribute shadows the method
    return model


def _copy(dst: Any, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Copy a weight (and bias) into the nn.Linear ``dst``."""
    with torch.no_grad():
        dst.weight.copy_(weight)
        if dst.bias is not None and bias is not None:
            dst.bias.copy_(bias)


def _embedding(ours: Any) -> nn.Sequential:
    """Our instance embedding (Linear + ReLU) as a peer's feature extractor, with our weights."""
    first = ours.embed[0]
    embed = nn.Sequential(nn.Linear(first.in_features, first.out_features), nn.ReLU(inplace=True))
    _copy(embed[0], first.weight, first.bias)
    return embed


def _torchmil(ours: Any) -> nn.Module:
    """torchmil's gated ABMIL with our embedding and attention weights (its classifier: our positive-class row)."""
    from torchmil.models import ABMIL

    theirs = ABMIL(in_shape=(DIM,), att_dim=ATTENTION, att_act="tanh", gated=True, feat_ext=_embedding(ours))
    proj, score = ours.attention.project, ours.attention.score
    with torch.no_grad():
        score.bias.zero_()  # torchmil's attention output has no bias
    _copy(theirs.pool.fc1.module, proj.weight[:ATTENTION], proj.bias[:ATTENTION])  # V
    _copy(theirs.pool.fc_gated.module, proj.weight[ATTENTION:], proj.bias[ATTENTION:])  # U
    _copy(theirs.pool.fc2, score.weight, None)  # w
    _copy(theirs.classifier.module, ours.classifier.weight[1:], ours.classifier.bias[1:])
    return theirs


class _MonaiHead(nn.Module):
    """MONAI's ``MILModel`` on cached features: ``calc_head(net(feats))`` (see the module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, N, D) features -> (B, C) logits."""
        return self.model.calc_head(self.model.net(feats))  # type: ignore[operator]


def _monai(ours: Any) -> nn.Module:
    """MONAI's attention MIL head with our embedding, ungated attention of width A, and our classifier."""
    from monai.networks.nets.milmodel import MILModel

    theirs = MILModel(num_classes=ours.num_classes, mil_mode="att", pretrained=False, backbone=_embedding(ours),
                      backbone_num_features=HIDDEN)
    theirs.attention = nn.Sequential(nn.Linear(HIDDEN, ATTENTION), nn.Tanh(), nn.Linear(ATTENTION, 1))
    proj, score = ours.attention.project, ours.attention.score
    _copy(theirs.attention[0], proj.weight, proj.bias)
    _copy(theirs.attention[2], score.weight, score.bias)
    _copy(theirs.myfc, ours.classifier.weight, ours.classifier.bias)
    return _MonaiHead(theirs)


def _reference(ours: Any) -> nn.Module:
    """The plain-torch additive MIL with our weights."""
    ref = AdditiveReference(DIM, HIDDEN, ATTENTION, CLASSIFIER_HIDDEN, ours.num_classes)
    first, proj, score = ours.embed[0], ours.attention.project, ours.attention.score
    _copy(ref.embed[0], first.weight, first.bias)
    _copy(ref.attention_v[0], proj.weight[:ATTENTION], proj.bias[:ATTENTION])
    _copy(ref.attention_u[0], proj.weight[ATTENTION:], proj.bias[ATTENTION:])
    _copy(ref.attention_w, score.weight, score.bias)
    _copy(ref.psi[0], ours.classifier[0].weight, None)
    _copy(ref.psi[2], ours.classifier[2].weight, None)
    with torch.no_grad():
        ref.bias.copy_(ours.bias)
    return ref


def build(names: list[str]) -> dict[str, tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]]:
    """name -> (module, logits of a (B, N, D) bag), peers sharing the weights of the ours they match.

    torchmil's one logit is compared with our positive-class logit (``logits[:, 1]``).
    """
    torch.manual_seed(0)
    out: dict[str, tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]] = {}
    want = set(names)
    if want & {"ours_gated", "ours_gated_unchecked", "torchmil_gated"}:
        gated = _ours("abmil_features", registered=False, gated=True)
        out["ours_gated"] = (gated, gated)
        if "ours_gated_unchecked" in want:
            unchecked = _without_input_checks(_ours("abmil_features", registered=False, gated=True))
            unchecked.load_state_dict(gated.state_dict())
            out["ours_gated_unchecked"] = (unchecked, unchecked)
        if "torchmil_gated" in want:
            tm = _torchmil(gated)
            out["torchmil_gated"] = (tm, lambda x, tm=tm: tm(x)[:, None])  # (B,) -> (B, 1)
    if want & {"ours_plain", "ours_plain_unchecked", "monai_att"}:
        plain = _ours("abmil_features", registered=False, gated=False)
        out["ours_plain"] = (plain, plain)
        if "ours_plain_unchecked" in want:
            unchecked = _without_input_checks(_ours("abmil_features", registered=False, gated=False))
            unchecked.load_state_dict(plain.state_dict())
            out["ours_plain_unchecked"] = (unchecked, unchecked)
        if "monai_att" in want:
            mo = _monai(plain)
            out["monai_att"] = (mo, mo)
    if "ours_registered" in want:
        reg = _ours("abmil_features", registered=True)
        out["ours_registered"] = (reg, reg)
    if want & {"ours_additive", "ours_additive_unchecked", "reference_additive"}:
        add = _ours("additive_mil_features", registered=False)
        out["ours_additive"] = (add, add)
        if "ours_additive_unchecked" in want:
            unchecked = _without_input_checks(_ours("additive_mil_features", registered=False))
            unchecked.load_state_dict(add.state_dict())
            out["ours_additive_unchecked"] = (unchecked, unchecked)
        if "reference_additive" in want:
            ref = _reference(add)
            out["reference_additive"] = (ref, ref)
    if "ours_additive_registered" in want:
        reg = _ours("additive_mil_features", registered=True)
        out["ours_additive_registered"] = (reg, reg)
    return {k: v for k, v in out.items() if k in want}


def _matched_diff(ours: Callable[[torch.Tensor], torch.Tensor], theirs: Callable[[torch.Tensor], torch.Tensor],
                  feats: torch.Tensor, their_name: str) -> float:
    """Largest |logit difference| of two matched networks on ``feats`` (eval, no autograd)."""
    with torch.no_grad():
        mine, other = ours(feats), theirs(feats)
    if their_name == "torchmil_gated":
        mine = mine[:, 1:]  # its classifier holds our positive-class row
    return float((mine.double() - other.double()).abs().max())


# ------------------------------------------------------------------------------------------------
# one step, timed in pairs
# ------------------------------------------------------------------------------------------------
def step_fn(module: nn.Module, logits: Callable[[torch.Tensor], torch.Tensor], feats: torch.Tensor,
            mode: str) -> Callable[[], None]:
    """One forward + backward (``fwdbwd``, train mode) or one forward without autograd (``eval``)."""
    if mode == "fwdbwd":
        module.train()

        def fwdbwd() -> None:
            logits(feats).sum().backward()
            module.zero_grad(set_to_none=True)
        return fwdbwd
    module.eval()

    def forward() -> None:
        with torch.no_grad():
            logits(feats)
    return forward


def pair_timings(theirs: Callable[[], None], ours: Callable[[], None], repeats: int,
                 device: str) -> tuple[Timing, Timing]:
    """``_common.compare`` of one pair, with at least enough repeats for about ``MIN_TIMED_S`` seconds.

    Pairs, not all candidates of a family in one rotation: on CPU a step's time depends on what
    the step before it left in the allocator (memory freed but kept by the C library is reused
    without page faults), so each comparison interleaves only its own two steps.
    """
    first = max(time_fn(theirs, repeats=1, warmup=0, device=device).wall_s,
                time_fn(ours, repeats=1, warmup=0, device=device).wall_s)
    rounds = min(MAX_REPEATS, max(repeats, math.ceil(MIN_TIMED_S / max(first, 1e-4))))
    return compare(theirs, ours, repeats=rounds, warmup=0, device=device)


def bench_times(rows: dict[str, tuple[str, str, str]], n: int, mode: str, repeats: int,
                device: str) -> list[dict[str, Any]]:
    """The time rows of one model family at one bag size and mode."""
    names = sorted({c for ours, theirs, _ in rows.values() for c in (ours, theirs)})
    models = build(names)
    for module, _ in models.values():
        module.to(device)
    feats = torch.randn(1, n, DIM, device=device)  # (B, N, D)
    check = feats[:, : min(n, 10_000)]
    diffs = {}
    for comparison, (ours, theirs, _) in rows.items():
        diffs[comparison] = _matched_diff(models[ours][1], models[theirs][1], check, theirs)
        if "registered" not in comparison and diffs[comparison] > MATCH_TOL:
            raise RuntimeError(f"{ours} and {theirs} are not the same network: logits differ by {diffs[comparison]:.3g} "
                               f"(> {MATCH_TOL}) with shared weights")
    steps = {k: step_fn(m, f, feats, mode) for k, (m, f) in models.items()}
    out = []
    for comparison, (ours, theirs, note) in rows.items():
        their_time, our_time = pair_timings(steps[theirs], steps[ours], repeats, device)
        extra: dict[str, Any] = {}
        if "registered" not in comparison:
            extra["matched_max_abs_diff"] = float(f"{diffs[comparison]:.3g}")
        out.append(ratio_row(f"mil_peers_{mode}_{_size(n)}_{comparison}", their_time, our_time, 1.0, "<=",
                             device, unit=f"our / their {'forward+backward' if mode == 'fwdbwd' else 'eval forward'} "
                             f"time, one bag of {n} x {DIM}", note=note, bag_size=n, feature_dim=DIM, hidden=HIDDEN,
                             attention_hidden=ATTENTION, ours=ours, theirs=theirs, **extra))
    return out


# ------------------------------------------------------------------------------------------------
# peak memory, one model per fresh subprocess
# ------------------------------------------------------------------------------------------------
def _worker(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--mode", choices=["fwdbwd", "eval"], required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    setup(a)
    # The peers share weights with the model they match, so that model is built too; only the
    # measured one runs. Building happens before the probe: parameters are a few hundred kB.
    module, logits = build([a.model])[a.model] if a.model.startswith("ours") else _peer_only(a.model)
    module.to(a.device)
    # One step on a small bag first: what any first call allocates once (lazily imported code, BLAS
    # buffers) is not memory of the bag; the probe then measures what the bag of N adds.
    step_fn(module, logits, torch.randn(1, WARMUP_BAG, DIM, device=a.device), a.mode)()
    probe = MemoryProbe(a.device)
    feats = torch.randn(1, a.n, DIM, device=a.device)  # (B, N, D), counted: every candidate reads it
    step_fn(module, logits, feats, a.mode)()
    worker_result({"peak_bytes": probe.peak_bytes(), **probe.describe()})


def _peer_only(name: str) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    ours = {"torchmil_gated": "ours_gated", "monai_att": "ours_plain", "reference_additive": "ours_additive"}[name]
    built = build([ours, name])
    del built[ours]
    return built[name]


def bench_memory(rows: dict[str, tuple[str, str]], n: int, mode: str, device: str) -> list[dict[str, Any]]:
    """The memory rows at one bag size and mode."""
    names = sorted({c for pair in rows.values() for c in pair})
    peak = {k: run_worker("bench_mil_peers.py", ["--model", k, "--n", str(n), "--mode", mode, "--device", device,
                                                 "--threads", str(torch.get_num_threads())])
            for k in names}
    out = []
    for comparison, (ours, theirs) in rows.items():
        mine, other = peak[ours]["peak_bytes"], peak[theirs]["peak_bytes"]
        value = mine / other
        out.append({"name": f"mil_peers_memory_{mode}_{_size(n)}_{comparison}", "value": round(value, 4), "target": 1.0,
                    "goal": "<=", "met": value <= 1.0,
                    "unit": f"our / their peak memory, {'forward+backward' if mode == 'fwdbwd' else 'eval forward'}, "
                            f"one bag of {n} x {DIM} (input included; fresh subprocess each)",
                    "ours_mb": round(mine / MB, 1), "theirs_mb": round(other / MB, 1), "ours": ours, "theirs": theirs,
                    "bag_size": n, "memory_measure": peak[ours]["memory_measure"], "machine": machine(device)})
    return out


def _modes(n: int, device: str) -> list[str]:
    """What is measured at bag size ``n``: on CPU, bags above ``FWDBWD_MAX_CPU`` in eval mode only."""
    return ["fwdbwd", "eval"] if torch.device(device).type != "cpu" or n <= FWDBWD_MAX_CPU else ["eval"]


def _size(n: int) -> str:
    return f"{n // 1_000_000}m" if n >= 1_000_000 and n % 1_000_000 == 0 else f"{n // 1000}k" if n % 1000 == 0 else str(n)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="bag sizes N (default: 1k 10k 100k 1M)")
    parser.add_argument("--families", nargs="+", choices=["abmil", "additive"], default=["abmil", "additive"],
                        help="model families (default: both)")
    parser.add_argument("--measure", nargs="+", choices=["time", "memory"], default=["time", "memory"],
                        help="time rows, peak-memory rows (fresh subprocesses), or both (default)")
    args = parser.parse_args()
    device = setup(args)
    families = {"abmil": dict(ABMIL_ROWS), "additive": dict(ADDITIVE_ROWS)}
    if importlib.util.find_spec("torchmil") is None:  # an optional peer: the other rows still run
        missing = [c for c, (_, theirs, _) in ABMIL_ROWS.items() if theirs == "torchmil_gated"]
        families["abmil"] = {c: v for c, v in ABMIL_ROWS.items() if c not in missing}
        if "abmil" in args.families:
            for n in args.sizes:
                for mode in _modes(n, device):
                    for c in missing:
                        emit(missing_row(f"mil_peers_{mode}_{_size(n)}_{c}", 1.0, "<=",
                                         "not run: torchmil is not installed (pip install torchmil)", device))
    time_rows = [families[f] for f in args.families]
    memory_rows = {c: v for c, v in MEMORY_ROWS.items() if any(c in families[f] for f in args.families)}
    for n in args.sizes:
        for mode in _modes(n, device):
            for rows in time_rows if "time" in args.measure else []:
                guarded({f"mil_peers_{mode}_{_size(n)}_{c}": (1.0, "<=") for c in rows}, None, None, device,
                        lambda rows=rows, n=n, mode=mode: bench_times(rows, n, mode, args.repeats, device))
            if "memory" in args.measure and memory_rows:
                guarded({f"mil_peers_memory_{mode}_{_size(n)}_{c}": (1.0, "<=") for c in memory_rows}, None, None, device,
                        lambda n=n, mode=mode: bench_memory(memory_rows, n, mode, device))


if __name__ == "__main__":
    main()
