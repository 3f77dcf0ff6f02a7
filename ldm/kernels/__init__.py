"""Exact CPU fast paths: the same function as the plain torch call, computed by a faster route.

Each module is one kernel family, used by the layers in ``ldm.models`` where the network's
``KernelChoice`` takes it (``choice``: measured once per CPU, since which route is faster differs
between CPUs) and the inputs allow it (device, dtype, autograd, sizes): ``linear`` (linear layers as oneDNN 1x1
convolutions), ``attention`` (long self-attention as 1x1 convolutions), ``conv`` (small-map
convolutions in output-channel slices, nearest-2x upsampling plus a 3x3 convolution as sub-pixel
convolutions). None changes a result beyond fp32 rounding, and none runs with autograd on. The
thresholds are module constants, so tests can move them to small sizes. Nothing here imports
``ldm.models``. ``cpu`` reads the CPU's model and flags.
"""
