complete -c mirrord -s c -l config -d 'The resource\'s config file (TOML), instead of a RESOURCE name' -r -F
complete -c mirrord -l node -d 'This node\'s name (default: $MIRROR_NODE, else the host name)' -r
complete -c mirrord -l log-level -d 'Log filter, e.g. "info" or "nbd_mirror=debug" (default: $RUST_LOG, else info)' -r
complete -c mirrord -s h -l help -d 'Print help (see more with \'--help\')'
complete -c mirrord -s V -l version -d 'Print version'
