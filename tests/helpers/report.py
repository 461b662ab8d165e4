"""Test job: writes its argv, chosen environment variables and Slurm placement as JSON."""

import hashlib
import json
import os
import sys

out, names = sys.argv[1], sys.argv[2].split(",") if len(sys.argv) > 2 else []
secret = os.environ.get("WANDB_API_KEY")
rank = os.environ.get("SLURM_PROCID", os.environ.get("SUBMITIT_LOCAL_GLOBALID", "0"))
record = {
    "argv": sys.argv[3:],
    "env": {n: os.environ.get(n) for n in names if n},
    "procid": rank,
    "node": os.environ.get("SLURMD_NODENAME"),
    "secret_sha256": hashlib.sha256(secret.encode()).hexdigest() if secret else None,
}
with open(f"{out}.{rank}.json", "w") as f:
    json.dump(record, f)
