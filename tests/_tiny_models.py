"""Tiny random-weight HF models for the Python-layer tests (no hub access).

Random tiny models have near-uniform logits, so greedy comparisons between a (K+1)-token batched
forward and a 1-token forward could hit near-ties; ``initializer_range=0.2`` makes top-2 margins
clear (checked by ``min_greedy_margin``) so the tests can assert exact equality.
"""
import torch

VOCAB = 96


def tiny_config(family: str = "llama", *, vocab_size: int = VOCAB, hidden_size: int = 64, layers: int = 2,
                seed_offset: int = 0, **extra):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "mistral": MistralConfig}[family]
    kwargs = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  initializer_range=0.2, max_position_embeddings=512, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "qwen3":
        kwargs["head_dim"] = hidden_size // 4
    kwargs.update(extra)
    return cls(**kwargs)


def tiny_model(family: str = "llama", seed: int = 0, *, attn_implementation: str = "sdpa", **kwargs):
    """fp32 tiny causal LM in eval mode, deterministic in ``seed``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **kwargs), attn_implementation=attn_implementation)
    return model.eval()


PROMPTS = [  # four lengths, with repetition so the n-gram drafter finds matches
    [1, 5, 6, 7, 8, 9, 5, 6, 7],
    [1, 20, 21],
    [1, 30, 31, 32, 30, 31, 32, 30, 31, 32, 40, 41, 42, 43],
    [1, 11, 12, 13, 14, 15],
]


def hf_greedy(model, prompt, max_new_tokens, eos_token_id=None):
    """The target's own greedy continuation (batch 1, no padding) as a list of ids."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=eos_token_id, pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


@torch.no_grad()
def min_greedy_margin(model, prompts, continuations):
    """Smallest top-1 minus top-2 logit over the positions that chose ``continuations``."""
    margin = float("inf")
    for prompt, cont in zip(prompts, continuations):
        logits = model(torch.tensor([prompt + cont])).logits[0, len(prompt) - 1: -1].float()
        top = logits.topk(2, dim=-1).values
        margin = min(margin, float((top[:, 0] - top[:, 1]).min()))
    return margin


def word_tokenizer(words):
    """A whitespace word-level fast tokenizer over ``words`` (ids 0-3: pad, bos, eos, unk)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


CHAT_TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}<s> assistant :{% endif %}")


def chat_tokenizer(vocab_size: int = VOCAB):
    """A word tokenizer of exactly ``vocab_size`` ids (words w0, w1, ...) with a ChatML-like template:
    ``<s> role : content </s>`` per turn; ``</s>`` (id 2) is the models' EOS, so an answer that ends
    in EOS re-renders to the same ids."""
    roles = ["system", "user", "assistant", ":"]
    tok = word_tokenizer(roles + [f"w{i}" for i in range(vocab_size - 4 - len(roles))])
    tok.chat_template = CHAT_TEMPLATE
    return tok
