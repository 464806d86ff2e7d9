"""mm.formats: every external checkpoint format, one module (or small package) each, all sharing the IO
helpers of `mm.lm.io` (atomic writes, JSON, safe tensor reading):

    hf_llama     Hugging Face Llama directories <-> our `Transformer` (`load_hf`, `save_hf`)
    meta_llama   Meta-format Llama directories (params.json + consolidated.NN.pth) -> `Transformer` (`load_meta`)
    hf_mllama    transformers Llama 3.2 Vision directories <-> `MultimodalLM` (`load_hf_mllama`, `save_hf_mllama`)
    meta_vision  Meta-format Llama 3.2 Vision directories -> `MultimodalLM` (`load_meta_vision`)
    timm         timm ViT weight files -> the image encoder's ViT (`load_timm_weights`, `build_image_encoder`)
    bundle       mm's own stage outputs: trained tensors + the frozen LM's identity (`save_bundle`, `verify_frozen`)

A new format is one module here using the helpers in `mm.lm.io`. The package imports none of them on import.
"""
