"""Random tiny HF LLaMA checkpoints made locally with transformers (never downloaded), and a
byte-level tokenizer for them."""
import json
import os


def make_hf_llama(path, *, tie=False, rope_scaling=None, vocab=96, hidden=64, layers=2, heads=4, kv_heads=2,
                  inter=112, dtype="float32", seed=0, max_shard_size=None, safe=True, head_dim=None):
    import torch  # deferred: torch is optional
    import transformers  # deferred: transformers is optional

    torch.manual_seed(seed)
    kw = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
              tie_word_embeddings=tie, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if head_dim:
        kw["head_dim"] = head_dim
    if rope_scaling:
        kw["rope_scaling"] = rope_scaling
        kw["rope_theta"] = 500000.0
    cfg = transformers.LlamaConfig(**kw)
    model = transformers.LlamaForCausalLM(cfg).to(getattr(torch, dtype)).eval()
    # Norm weights are ones at init: randomise them so parity tests cover the norm scales.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    kwargs = {"safe_serialization": safe}
    if max_shard_size:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(path, **kwargs)
    return model


def hf_logits(model, tokens):
    import torch  # deferred: torch is optional

    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.float().numpy()


def write_byte_tokenizer(d, model_max_length=256) -> int:
    """A byte-level tokenizer.json without merges (one token per byte) in directory d that transformers
    and a3jax's HFTokenizer both read; ids 0-2 are pad, BOS, EOS (as make_hf_llama's config says), and,
    as for SmolLM2, no BOS is added. Returns the vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for c in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[c] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<pad>", "<s>", "</s>"])
    tok.save(os.path.join(str(d), "tokenizer.json"))
    with open(os.path.join(str(d), "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                   "pad_token": "<pad>", "add_bos_token": False, "model_max_length": model_max_length}, f)
    return len(vocab)
