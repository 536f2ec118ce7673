"""One resolver for the process environment: SLURM, torchrun / torch elastic, the deepspeed launcher,
or a single process. It fills RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT so that
torch.distributed and DeepSpeed see one consistent picture, and fails loudly on a half-set environment.

Every rendezvous has a bounded timeout; its error names the address, port and rank, and rank 0 says
which ranks never arrived. Multi-node hangs are the most expensive failure our users have, so the
rendezvous is done here (a TCPStore plus a join barrier) rather than left to a silent default.

After the rendezvous a watchdog thread on every rank keeps the job honest (see `Watchdog`): a rank that
fails says so in the store and every other rank ends within seconds, even one blocked in a collective;
a rank that stops answering (killed, SIGSTOPped, wedged) is noticed by its neighbour within
$VIT_PRETRAIN_HEARTBEAT_TIMEOUT seconds. docs/reliability.md has the measured figures.

Modules: `env` (the resolver), `rendezvous` (setup), `watchdog` (the watchdog, abort, teardown), `share`
(rank 0 reads, the others receive: `broadcast_from_rank0` on the CPU group `cpu_group`).
"""
from pretrain.dist.env import DistEnv, device_index, export_env, free_port, rank_device, resolve
from pretrain.dist.rendezvous import RendezvousError, gloo_interface, setup
from pretrain.dist.share import broadcast_from_rank0, cpu_group
from pretrain.dist.watchdog import abort, run_guarded, teardown

__all__ = ["DistEnv", "RendezvousError", "abort", "broadcast_from_rank0", "cpu_group", "device_index", "export_env",
           "free_port", "gloo_interface", "rank_device", "resolve", "run_guarded", "setup", "teardown"]
