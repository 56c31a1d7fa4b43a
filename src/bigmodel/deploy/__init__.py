"""Taking a trained model out: export (safetensors, ONNX, int8), batch prediction, serving.

bundle.py   a checkpoint or an exported folder -> net + what its inputs need (`Bundle`)
graphs.py   the inference graph of each kind of model (what PyTorch runs and ONNX holds)
onnx.py     dynamo export, parity against PyTorch, int8, ONNX Runtime sessions
folder.py   the exported folder and its model card; atomic writes
inputs.py   files and request fields -> model inputs, as the training data prepared them
runtime.py  one interface over PyTorch and ONNX Runtime (`Runner`)
scoring.py  int8 next to fp32 on the checkpoint's held-out data
requests.py what serve.py accepts, checked key by key (4xx messages)
export.py predict.py serve.py   the entry points behind the scripts of the same names
"""
