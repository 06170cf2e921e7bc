"""`manzano-edge bench`: latency, throughput, memory and roofline of exported bundles vs eager PyTorch."""
