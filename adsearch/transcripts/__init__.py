"""What participants said: transcripts from an ASR model (`asr`, `run`) or imported (`imports`), kept in one
folder format (`store`) that the linguistic and text feature sources read."""
