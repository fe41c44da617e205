"""Process hooks every command installs: glibc malloc settings that keep freed memory mapped
(host_memory) and grain workers that die with their parent (process_watch). Imports nothing
else of flamingo_jax, so the package import and the errors module can use them."""
