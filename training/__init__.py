"""crossfield.training"""
