"""Models: importing this package registers every meta-architecture."""
