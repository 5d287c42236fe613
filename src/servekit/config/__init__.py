# Configuration: composing a server class from features (compose), and the settings
# table generated from the knob declarations (docs). Imports the production features;
# nothing below the command line imports this package.
