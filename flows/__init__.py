"""Prefect flows: thin wrappers around :mod:`distill.stages`, one per stage plus the whole pipeline.

They pass paths and small values, never tensors or models. ``dvc.yaml`` runs each stage flow via
``python -m flows stage <name>``; the pipeline flow runs ``dvc repro`` / ``dvc exp run`` so that
DVC alone decides what is up to date.
"""
