"""``python -m loratools …`` runs the same CLI as the ``loratools`` script (useful inside a venv
whose scripts folder is not on PATH, e.g. a ComfyUI or A1111 embedded Python)."""

from .cli.main import main

if __name__ == "__main__":
    main()
