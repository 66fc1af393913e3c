"""crowdtrain: train open language models together on volunteer hardware.

A coordinator hosts a run (model, corpus, schedule); volunteers join with one command, train
many local steps (DiLoCo) and send back a compressed pseudo-gradient over plain HTTP.
"""

__version__ = "0.1.0"
