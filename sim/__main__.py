"""`python -m sim --config FILE`: the simulated line on its own (same as `sorter sim run`)."""

from sorter.cli import sim_main

sim_main()
