"""What every command runs on: the device mesh and sharding rules, jax.distributed start,
parameter I/O and the process hooks (host memory, grain workers that die with their parent)."""
