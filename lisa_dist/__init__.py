"""lisa_dist: memory-efficient full-parameter fine-tuning (LISA, LOMO) on FSDP2 and ZeRO-3."""

__version__ = "0.1.0"
