"""Building blocks every family shares: backbones and their latent grid (:mod:`.backbones`),
physical-unit heads (:mod:`.heads`) and the training-stage interface (:mod:`.stages`)."""
