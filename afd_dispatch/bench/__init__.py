"""`afd-dispatch bench`: how fast the reference backend and the runtime around it are.

One module per level (`ops`, `loop`, `serving`), each with `run(shape, repeat) -> Report`;
`report` prints, saves and plots the results. Every speed figure is a ratio (or a
difference) of times measured in the same run, never an absolute time compared across
runs: the hosts this runs on are small and shared.
"""
