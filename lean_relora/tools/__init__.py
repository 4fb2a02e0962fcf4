"""What runs on a run's results: exporting, evaluating and picturing checkpoints and metrics.

    export        `lean-relora export` and `eval`: a checkpoint as a Hugging Face model directory, or its eval loss
    rebuild       a trained model rebuilt from a checkpoint, one layer at a time
    hf_shards     Hugging Face's sharded safetensors layout, written one merged layer at a time
    report        `lean-relora report`: loss, learning rate and restarts of one or several runs as pictures
    spectrum      singular values of the update a run accumulated in one layer (report --spectrum)
    fidelity      a study of how much of many merged updates a stored base keeps (bench/fidelity.py)
"""
