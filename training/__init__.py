"""What train.py and validate.py share: config, data, engine, checkpoint, distributed, reporting."""
