"""`python -m sim --config FILE`: the simulated line on its own (same as `sorter sim`)."""

from sim.cli import sim_main

sim_main()
