"""`plural export`: an adapter (or a stored base) leaves plural as a GGUF LoRA, a full GGUF, an Ollama
folder or a Hugging Face folder for vLLM / TGI / SGLang, written in Python with no llama.cpp checkout.

    source.py    the adapter or model to export, its base in the store, and what a GGUF LoRA refuses
    arch.py      the model families the GGUF writer knows: tensor names, RoPE row permutation
    gguf_lora.py PEFT LoRA -> llama.cpp GGUF LoRA, and the reader that reads one back
    gguf_model.py a whole model -> GGUF (metadata, tokenizer, chat template, Python quantisation)
    hf.py        merged safetensors or the PEFT adapter, named for a serving engine
    ollama.py    Modelfile with a TEMPLATE derived from (and checked against) the Jinja chat template
    files.py     output paths: refuse an existing one without force, write beside it and rename
"""
