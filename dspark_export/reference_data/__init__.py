"""Data shipped for the reference pair (drafter weights and checksums)."""
