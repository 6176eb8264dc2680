"""Tools that are not the product: the demo, the benchmark and the real-KVM test bed.

They live in the source tree (tools/), install as their own distribution (hyperbroker-tools,
`make venv` installs it beside hyperbroker) and add their subcommands to `hyperbroker` through
the entry-point group `hyperbroker.commands` (hyperbroker_tools.commands). They import the
product; the product never imports them. The KVM bed needs the checkout itself (vmm/, the C
guests), so none of this ships in hyperbroker's wheel.
"""
