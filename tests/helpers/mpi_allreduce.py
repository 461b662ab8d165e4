"""A plain mpi4py program (as mpi4py's tutorial writes it): an all-reduce of the ranks. It knows
nothing of hpcdl or Slurm. Each rank writes what it saw to ``PREFIX.RANK.json``."""

import json
import os
import sys

from mpi4py import MPI

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
total = comm.allreduce(rank, op=MPI.SUM)
with open(f"{sys.argv[1]}.{rank}.json", "w") as f:
    json.dump(
        {"rank": rank, "size": size, "sum": total, "node": os.environ.get("SLURMD_NODENAME")}, f
    )
