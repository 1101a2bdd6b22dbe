"""File-name suffixes that say what a file may hold, in one place (census, batch, folder inspect and
the readers all ask), apart from the pickle reader itself so that deciding a file's kind never
imports the opcode scanner (issue 18 item 4). Compare them with a lower-cased name."""

from __future__ import annotations

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
# a file that may hold a LoRA, a checkpoint or embeddings; pickles are among them (opened only
# through io.pickle's weights_only loader, and never in a census)
WEIGHT_FILE_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES
