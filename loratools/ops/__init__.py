"""Operations on canonical objects: no file formats, no printing."""
