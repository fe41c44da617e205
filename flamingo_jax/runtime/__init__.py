"""What every command runs on, trainers and apps alike: the device mesh and its sharding rules,
the jax.distributed start, and parameter-tree I/O (orbax) into target shardings."""
