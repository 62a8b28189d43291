"""Pretraining (``run_pretrain.py``): GPT-style datasets over mmap token files, the Trainer, the workflow."""
