"""Preprocessing stages of the workflow, one module per concern.

datasets  dataset specs from the config, validated loading of .h5ad expression,
          the bundled PBMC demo and the synthetic negative-binomial generator
hvg       stage 1: highly variable gene selection (scanpy)
binning   stage 2: scGPT-style per-cell value binning into memory-mappable arrays
split     stage 3: train/val/test split and CV folds
arrays    BinnedData: memory-mapped access to the binned arrays (training ranks)
step      run one workflow step with its log file (used by workflow_scripts/)
"""
