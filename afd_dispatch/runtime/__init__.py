"""The AFD runtime around the op family: model descriptions, weight loading, serving loops."""
