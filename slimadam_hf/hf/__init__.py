"""The Hugging Face layer: ``--optim slimadam`` registration, ``--optim_args``, callbacks, the run wrapper."""
