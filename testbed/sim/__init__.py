"""The simulator: the live experiment loop on a virtual lab in simulated time (docs/simulator.md).

``sim.lab.SimLab`` is the virtual lab, ``sim.population`` its devices and server (from a profile,
or a drawn population), ``sim.run.prepare`` puts an experiment, a profile and the lab together
for ``live.loop.run``; ``testbed simulate`` is the command.
"""
