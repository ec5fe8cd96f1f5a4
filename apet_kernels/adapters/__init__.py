"""What both entry points share, written once: choosing positions (``choosing``), putting adapters on a model and
taking them off (``patching``), the per-layer records a save writes and a load checks (``records``), the adapter
registry and its rules (``registry``), mixed-adapter batches (``mixed_batch``). Neither entry point is imported here:
``inplace`` (get_apet_model, load_apet) and ``peft_method`` (APET as a PEFT method) stand beside each other on it."""
