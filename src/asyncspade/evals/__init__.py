"""Task evaluations: datasets, answer extraction/verification, passkey retrieval."""
