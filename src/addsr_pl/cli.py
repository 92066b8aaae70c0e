"""`addsr-pl <command>`: upscale (images), import-official (the released AddSR model as a student folder),
train and evaluate (Hydra overrides)."""

from __future__ import annotations

import sys

COMMANDS = {
    "upscale": "addsr_pl.upscale",
    "import-official": "addsr_pl.inference.official",
    "train": "addsr_pl.train",
    "evaluate": "addsr_pl.evaluate",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: addsr-pl {{{','.join(COMMANDS)}}} ...  (addsr-pl <command> --help for its options)")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    import importlib

    command = importlib.import_module(COMMANDS[argv[0]])
    if argv[0] in ("upscale", "import-official"):
        return command.main(argv[1:])
    if argv[0] == "train":
        command.check_launcher_extras(argv[1:])
    sys.argv = [f"addsr-pl {argv[0]}", *argv[1:]]  # Hydra reads its overrides from sys.argv
    command.main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
