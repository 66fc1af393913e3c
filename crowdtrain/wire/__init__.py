"""The contract between coordinator and volunteers: the HTTP messages (`protocol`), the tensor
codecs (`codecs`) and the outer step both sides apply bit for bit (`outer`). Imports nothing
of crowdtrain but `errors`; everything else may import it."""
