"""Tiny LLaMA GGUF files written locally with the `gguf` package (llama.cpp's writer), from random HF
LLaMAs (tests/hf_models.py): llama.cpp's q/k row permutation, chosen tensor types, and a
SentencePiece or byte-level BPE vocabulary in the metadata."""
import numpy as np

# llama.cpp token types
NORMAL, UNKNOWN, CONTROL, BYTE = 1, 2, 3, 6


def llamacpp_permute(w, n_head):
    """convert_hf_to_gguf.py's permute of q/k rows (HF rotate-half -> llama.cpp interleaved RoPE)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def spm_vocab():
    """A small SentencePiece-style vocabulary: <unk> <s> </s>, the 256 byte tokens, then pieces with
    scores (the longer, the higher); no merges (recovered from the scores)."""
    tokens, types, scores = ["<unk>", "<s>", "</s>"], [UNKNOWN, CONTROL, CONTROL], [0.0, 0.0, 0.0]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [BYTE] * 256
    scores += [0.0] * 256
    pieces = ["\u2581", "t", "h", "e", "a", "c", "l", "o", "w", "r", "d", "\u2581t", "\u2581th", "\u2581the",
              "he", "\u2581c", "\u2581ca", "\u2581cat", "at", "ll", "llo", "\u2581h", "\u2581he", "\u2581hello",
              "\u2581w", "\u2581wor", "or", "ld", "\u2581world", "\u2581a"]
    for i, p in enumerate(pieces):
        tokens.append(p)
        types.append(NORMAL)
        scores.append(-100.0 + len(p) * 10 - i * 0.01)
    return tokens, types, scores


def write_llama_gguf(path, model, *, types=None, tokenizer="spm", arch="llama", extra_kv=None, extra_tensors=None,
                     drop=(), rope_freqs=None):
    """Writes `model` (a transformers LlamaForCausalLM) as a llama GGUF. types: GGUF name -> GGML type name
    (default F32). extra_kv: key -> value written as is (str/float/int/bool). Returns the path."""
    import gguf  # deferred: tests only

    cfg = model.config
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
           "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
           "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
           "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
           "mlp.down_proj.weight": "ffn_down.weight"}
    w = gguf.GGUFWriter(str(path), arch)
    a = arch + "."
    w.add_uint32(a + "block_count", cfg.num_hidden_layers)
    w.add_uint32(a + "context_length", cfg.max_position_embeddings)
    w.add_uint32(a + "embedding_length", cfg.hidden_size)
    w.add_uint32(a + "feed_forward_length", cfg.intermediate_size)
    w.add_uint32(a + "attention.head_count", heads)
    w.add_uint32(a + "attention.head_count_kv", kv)
    w.add_float32(a + "attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    w.add_float32(a + "rope.freq_base", float(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]))
    w.add_uint32(a + "rope.dimension_count", cfg.hidden_size // heads)
    w.add_uint32(a + "vocab_size", cfg.vocab_size)
    if tokenizer == "spm":
        tokens, ttypes, scores = spm_vocab()
        assert len(tokens) == cfg.vocab_size, (len(tokens), cfg.vocab_size)
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_types(ttypes)
        w.add_token_scores(scores)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_uint32("tokenizer.ggml.unknown_token_id", 0)
    elif tokenizer is not None:
        w.add_tokenizer_model(tokenizer)
        w.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])
    for k, v in (extra_kv or {}).items():
        if isinstance(v, bool):
            w.add_bool(k, v)
        elif isinstance(v, str):
            w.add_string(k, v)
        elif isinstance(v, float):
            w.add_float32(k, v)
        else:
            w.add_uint32(k, int(v))
    tensors = []
    for key, t in sd.items():
        if key.startswith("model.layers."):
            _, _, i, rest = key.split(".", 3)
            name = f"blk.{i}.{per[rest]}"
        elif key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        else:
            name = names[key]
        if rest_is(key, "q_proj"):
            t = llamacpp_permute(t, heads)
        elif rest_is(key, "k_proj"):
            t = llamacpp_permute(t, kv)
        tensors.append((name, t))
    if rope_freqs is not None:
        tensors.append(("rope_freqs.weight", np.asarray(rope_freqs, np.float32)))
    tensors += list((extra_tensors or {}).items())
    for name, t in tensors:
        if name in drop:
            continue
        qtype = gguf.GGMLQuantizationType[(types or {}).get(name, "F32")]
        if qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, t.astype(np.float32))
        else:
            q = gguf.quants.quantize(t.astype(np.float32), qtype)
            w.add_tensor(name, q, raw_dtype=None if qtype == gguf.GGMLQuantizationType.F16 else qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def rest_is(key, proj):
    return key.endswith(f"self_attn.{proj}.weight")
