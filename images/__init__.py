"""Container images for Layotto: the example modules and an OCI image layout builder.

``layotto.images.builder`` writes OCI image layout archives (``ctr images import``
accepts them) holding a WebAssembly module either in an ordinary image layer or as
an OCI wasm artifact; ``layotto image`` is its command line.
"""
