"""What tests and tools use to drive the product without the real world around it: a fake
handler context (`context`), per-ABI fixtures (`ffa`, `optee`, the OP-TEE guest-driver model
`optee_guest`, an in-process TEE backend `tee_backend`), a Python VMM (`vmm`) and the process
helpers that start brokers, agents and TEE services (`procs`). Handler authors may use them; the
product itself never imports them."""
