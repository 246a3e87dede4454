"""Entry point of the ``tokenformer-vision`` command: ``--version`` and ``--help`` answer without importing the
package (whose import registers the models with timm, which imports torch and torchvision: seconds), everything
else runs :func:`tokenformer_vision.cli.main`."""

from __future__ import annotations

import sys

USAGE = """usage: tokenformer-vision [-h] [--version] {fit,validate,test,predict,export,grow} ...

TokenFormer vision transformers: train and evaluate ImageClassifier (Lightning), export to timm weights and ONNX,
grow a checkpoint.

subcommands (`tokenformer-vision SUBCOMMAND --help` lists the options of one):
  fit       train (--config, --model.*, --data.*, --trainer.*; --ckpt_path last resumes)
  validate  evaluate a checkpoint on the validation split (--ckpt_path best|last|FILE)
  test      evaluate a checkpoint on the test split
  predict   write top-k predictions to a CSV or JSON file (--predict_out)
  export    Lightning checkpoint -> timm weights (model.safetensors + config.json), optionally ONNX
  grow      grow a checkpoint offline: the model, its EMA copy and the optimizer state

options:
  -h, --help  show this message and exit
  --version   print the version and exit
"""


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--version"]:
        from importlib.metadata import version

        print(f"tokenformer-vision {version('tokenformer_vision')}")
        return
    if not args or args[:1] in (["-h"], ["--help"]):
        print(USAGE, end="", file=sys.stdout if args else sys.stderr)
        sys.exit(0 if args else 2)
    from tokenformer_vision.cli import main as run

    run(args)


if __name__ == "__main__":
    main()
