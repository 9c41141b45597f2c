"""cnnkernels.bench: the per-architecture benchmark behind `cnnkernels-bench`.

    cnnkernels-bench --models resnet50,googlenet          # or: python -m cnnkernels.bench

architectures: the table of models and their baselines; harness: building and
measuring each variant; memory: peak memory and how it is measured; environment:
device, versions, load; report: terminal table, JSON and PNG; cli: the command line.
"""
