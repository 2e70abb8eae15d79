"""Tools the tasks build on: the VQ image tokenizer (``vq``), the attribute probe that judges generated images
(``probe``) and image-backbone pretraining (``backbone_pretrain``)."""
