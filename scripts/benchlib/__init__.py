"""Helpers shared by the scripts under ``scripts/`` (not scripts themselves): ``common`` (device/dtype arguments,
timing, memory, machine info, generated JPEGs), ``harness`` (``train_eval``: training through the library's own
ImageClassifier + DataModule + Trainer path) and ``fit_timing`` (a step-timing Lightning callback).

A script under ``scripts/<folder>/`` makes the package importable with
``sys.path.insert(0, str(Path(__file__).resolve().parents[1]))``.
"""
