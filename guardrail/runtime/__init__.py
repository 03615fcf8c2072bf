"""The guarded decoding loop, step by step: engine -> capture -> features -> probe/schedule -> policy -> guard."""
