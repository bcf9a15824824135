"""Model heads ``slimadam inspect --task`` can build: task name -> transformers Auto class.

Without ``--task`` the first class that knows the config is built: masked LM comes before causal LM, so an
encoder (BERT, RoBERTa) gets the head it is trained with, not its decoder variant (``BertLMHeadModel``).
"""

TASKS = {
    "masked-lm": "AutoModelForMaskedLM",
    "causal-lm": "AutoModelForCausalLM",
    "image-classification": "AutoModelForImageClassification",
    "sequence-classification": "AutoModelForSequenceClassification",
    "base": "AutoModel",
}
