"""The lowest floor: decoding audio, reading user YAML, writing files whole, hashing files. Imports nothing
else of adsearch, so every other package may import it."""
