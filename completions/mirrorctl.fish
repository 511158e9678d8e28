# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_mirrorctl_global_optspecs
    string join \n c/config= node= h/help V/version
end

function __fish_mirrorctl_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_mirrorctl_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_mirrorctl_using_subcommand
    set -l cmd (__fish_mirrorctl_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c mirrorctl -n "__fish_mirrorctl_needs_command" -s c -l config -d 'The resource\'s config file (TOML), instead of a RESOURCE name' -r -F
complete -c mirrorctl -n "__fish_mirrorctl_needs_command" -l node -d 'This node\'s name (default: $MIRROR_NODE, else the host name)' -r
complete -c mirrorctl -n "__fish_mirrorctl_needs_command" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c mirrorctl -n "__fish_mirrorctl_needs_command" -s V -l version -d 'Print version'
complete -c mirrorctl -n "__fish_mirrorctl_needs_command" -f -a "create-md" -d 'Write fresh metadata on this node\'s disk (all blocks out of sync)'
complete -c mirrorctl -n "__fish_mirrorctl_needs_command" -f -a "dump-md" -d 'Print the metadata as JSON'
complete -c mirrorctl -n "__fish_mirrorctl_needs_command" -f -a "check-config" -d 'Validate the config and print the resolved settings for this node'
complete -c mirrorctl -n "__fish_mirrorctl_needs_command" -f -a "gen-secret" -d 'Write a new random shared secret (mode 0600); never overwrites one'
complete -c mirrorctl -n "__fish_mirrorctl_needs_command" -f -a "status" -d 'Show the resource\'s state'
complete -c mirrorctl -n "__fish_mirrorctl_needs_command" -f -a "events" -d 'Stream state changes as JSON lines until interrupted'
complete -c mirrorctl -n "__fish_mirrorctl_needs_command" -f -a "primary" -d 'Become primary'
complete -c mirrorctl -n "__fish_mirrorctl_needs_command" -f -a "secondary" -d 'Become secondary'
complete -c mirrorctl -n "__fish_mirrorctl_needs_command" -f -a "connect" -d 'Start the peer link'
complete -c mirrorctl -n "__fish_mirrorctl_needs_command" -f -a "disconnect" -d 'Stop the peer link'
complete -c mirrorctl -n "__fish_mirrorctl_needs_command" -f -a "resync" -d 'Start a resync with this node as the source'
complete -c mirrorctl -n "__fish_mirrorctl_needs_command" -f -a "verify" -d 'Online verify: compare every block with the peer'
complete -c mirrorctl -n "__fish_mirrorctl_needs_command" -f -a "invalidate" -d 'Discard this node\'s data and resync all of it from the peer'
complete -c mirrorctl -n "__fish_mirrorctl_needs_command" -f -a "resume-io" -d 'Lift a fencing freeze by hand (the fence-peer handler failed or hangs)'
complete -c mirrorctl -n "__fish_mirrorctl_needs_command" -f -a "restart" -d 'Restart mirrord in place, keeping its NBD clients connected'
complete -c mirrorctl -n "__fish_mirrorctl_needs_command" -f -a "adjust" -d 'Apply a changed config file to the running daemon, without a restart'
complete -c mirrorctl -n "__fish_mirrorctl_needs_command" -f -a "attach" -d 'Attach /dev/nbdN to the resource\'s export through the kernel\'s netlink interface'
complete -c mirrorctl -n "__fish_mirrorctl_needs_command" -f -a "wait-sync" -d 'Wait until connected and both disks are up to date'
complete -c mirrorctl -n "__fish_mirrorctl_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand create-md" -s c -l config -d 'The resource\'s config file (TOML), instead of a RESOURCE name' -r -F
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand create-md" -l node -d 'This node\'s name (default: $MIRROR_NODE, else the host name)' -r
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand create-md" -l force -d 'Overwrite existing metadata'
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand create-md" -s h -l help -d 'Print help'
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand dump-md" -s c -l config -d 'The resource\'s config file (TOML), instead of a RESOURCE name' -r -F
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand dump-md" -l node -d 'This node\'s name (default: $MIRROR_NODE, else the host name)' -r
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand dump-md" -l all-ranges -d 'List every out-of-sync range (default: the first 16)'
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand dump-md" -s h -l help -d 'Print help'
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand check-config" -s c -l config -d 'The resource\'s config file (TOML), instead of a RESOURCE name' -r -F
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand check-config" -l node -d 'This node\'s name (default: $MIRROR_NODE, else the host name)' -r
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand check-config" -s h -l help -d 'Print help'
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand gen-secret" -s c -l config -d 'The resource\'s config file (TOML), instead of a RESOURCE name' -r -F
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand gen-secret" -l node -d 'This node\'s name (default: $MIRROR_NODE, else the host name)' -r
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand gen-secret" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand status" -s c -l config -d 'The resource\'s config file (TOML), instead of a RESOURCE name' -r -F
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand status" -l node -d 'This node\'s name (default: $MIRROR_NODE, else the host name)' -r
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand status" -l json -d 'Print the state as JSON'
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand status" -s h -l help -d 'Print help'
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand events" -s c -l config -d 'The resource\'s config file (TOML), instead of a RESOURCE name' -r -F
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand events" -l node -d 'This node\'s name (default: $MIRROR_NODE, else the host name)' -r
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand events" -s h -l help -d 'Print help'
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand primary" -s c -l config -d 'The resource\'s config file (TOML), instead of a RESOURCE name' -r -F
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand primary" -l node -d 'This node\'s name (default: $MIRROR_NODE, else the host name)' -r
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand primary" -l force -d 'Promote even with an inconsistent or outdated disk; this node\'s data wins'
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand primary" -s h -l help -d 'Print help'
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand secondary" -s c -l config -d 'The resource\'s config file (TOML), instead of a RESOURCE name' -r -F
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand secondary" -l node -d 'This node\'s name (default: $MIRROR_NODE, else the host name)' -r
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand secondary" -s h -l help -d 'Print help'
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand connect" -s c -l config -d 'The resource\'s config file (TOML), instead of a RESOURCE name' -r -F
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand connect" -l node -d 'This node\'s name (default: $MIRROR_NODE, else the host name)' -r
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand connect" -l discard-my-data -d 'Resolve a split brain by discarding this node\'s changes'
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand connect" -s h -l help -d 'Print help'
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand disconnect" -s c -l config -d 'The resource\'s config file (TOML), instead of a RESOURCE name' -r -F
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand disconnect" -l node -d 'This node\'s name (default: $MIRROR_NODE, else the host name)' -r
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand disconnect" -s h -l help -d 'Print help'
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand resync" -s c -l config -d 'The resource\'s config file (TOML), instead of a RESOURCE name' -r -F
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand resync" -l node -d 'This node\'s name (default: $MIRROR_NODE, else the host name)' -r
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand resync" -l full -d 'Resync every block, not only the out-of-sync ones'
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand resync" -l checksum -d 'Compare block checksums first; send only the blocks that differ'
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand resync" -l wait -d 'Show progress until the resync ends'
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand resync" -s h -l help -d 'Print help'
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand verify" -s c -l config -d 'The resource\'s config file (TOML), instead of a RESOURCE name' -r -F
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand verify" -l node -d 'This node\'s name (default: $MIRROR_NODE, else the host name)' -r
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand verify" -l wait -d 'Show progress until the verify ends'
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand verify" -s h -l help -d 'Print help'
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand invalidate" -s c -l config -d 'The resource\'s config file (TOML), instead of a RESOURCE name' -r -F
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand invalidate" -l node -d 'This node\'s name (default: $MIRROR_NODE, else the host name)' -r
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand invalidate" -s h -l help -d 'Print help'
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand resume-io" -s c -l config -d 'The resource\'s config file (TOML), instead of a RESOURCE name' -r -F
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand resume-io" -l node -d 'This node\'s name (default: $MIRROR_NODE, else the host name)' -r
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand resume-io" -s h -l help -d 'Print help'
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand restart" -l exe -d 'The binary to run (default: the path mirrord was started from, so an upgrade installed there is picked up)' -r -F
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand restart" -l timeout -d 'Give up waiting for the new process after this many seconds' -r
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand restart" -s c -l config -d 'The resource\'s config file (TOML), instead of a RESOURCE name' -r -F
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand restart" -l node -d 'This node\'s name (default: $MIRROR_NODE, else the host name)' -r
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand restart" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand adjust" -s c -l config -d 'The resource\'s config file (TOML), instead of a RESOURCE name' -r -F
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand adjust" -l node -d 'This node\'s name (default: $MIRROR_NODE, else the host name)' -r
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand adjust" -l dry-run -d 'Only say what would change'
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand adjust" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand attach" -l connections -d 'Connections (-C of nbd-client); mirrord is multi-connection safe' -r
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand attach" -l timeout -d 'Kernel request timeout: a request without a reply by then is sent again on another connection. It bounds the pause after a crash (docs/OPERATIONS.md)' -r
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand attach" -l dead-conn-timeout -d 'Seconds new requests wait while no connection is live; then they fail' -r
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand attach" -l block-size -d 'Logical block size in bytes' -r
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand attach" -l start-timeout -d 'Seconds the first attach waits for mirrord\'s export' -r
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand attach" -s c -l config -d 'The resource\'s config file (TOML), instead of a RESOURCE name' -r -F
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand attach" -l node -d 'This node\'s name (default: $MIRROR_NODE, else the host name)' -r
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand attach" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand wait-sync" -l timeout -d 'Give up after this many seconds and exit 1 (0: wait for ever)' -r
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand wait-sync" -s c -l config -d 'The resource\'s config file (TOML), instead of a RESOURCE name' -r -F
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand wait-sync" -l node -d 'This node\'s name (default: $MIRROR_NODE, else the host name)' -r
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand wait-sync" -s h -l help -d 'Print help'
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand help; and not __fish_seen_subcommand_from create-md dump-md check-config gen-secret status events primary secondary connect disconnect resync verify invalidate resume-io restart adjust attach wait-sync help" -f -a "create-md" -d 'Write fresh metadata on this node\'s disk (all blocks out of sync)'
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand help; and not __fish_seen_subcommand_from create-md dump-md check-config gen-secret status events primary secondary connect disconnect resync verify invalidate resume-io restart adjust attach wait-sync help" -f -a "dump-md" -d 'Print the metadata as JSON'
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand help; and not __fish_seen_subcommand_from create-md dump-md check-config gen-secret status events primary secondary connect disconnect resync verify invalidate resume-io restart adjust attach wait-sync help" -f -a "check-config" -d 'Validate the config and print the resolved settings for this node'
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand help; and not __fish_seen_subcommand_from create-md dump-md check-config gen-secret status events primary secondary connect disconnect resync verify invalidate resume-io restart adjust attach wait-sync help" -f -a "gen-secret" -d 'Write a new random shared secret (mode 0600); never overwrites one'
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand help; and not __fish_seen_subcommand_from create-md dump-md check-config gen-secret status events primary secondary connect disconnect resync verify invalidate resume-io restart adjust attach wait-sync help" -f -a "status" -d 'Show the resource\'s state'
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand help; and not __fish_seen_subcommand_from create-md dump-md check-config gen-secret status events primary secondary connect disconnect resync verify invalidate resume-io restart adjust attach wait-sync help" -f -a "events" -d 'Stream state changes as JSON lines until interrupted'
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand help; and not __fish_seen_subcommand_from create-md dump-md check-config gen-secret status events primary secondary connect disconnect resync verify invalidate resume-io restart adjust attach wait-sync help" -f -a "primary" -d 'Become primary'
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand help; and not __fish_seen_subcommand_from create-md dump-md check-config gen-secret status events primary secondary connect disconnect resync verify invalidate resume-io restart adjust attach wait-sync help" -f -a "secondary" -d 'Become secondary'
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand help; and not __fish_seen_subcommand_from create-md dump-md check-config gen-secret status events primary secondary connect disconnect resync verify invalidate resume-io restart adjust attach wait-sync help" -f -a "connect" -d 'Start the peer link'
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand help; and not __fish_seen_subcommand_from create-md dump-md check-config gen-secret status events primary secondary connect disconnect resync verify invalidate resume-io restart adjust attach wait-sync help" -f -a "disconnect" -d 'Stop the peer link'
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand help; and not __fish_seen_subcommand_from create-md dump-md check-config gen-secret status events primary secondary connect disconnect resync verify invalidate resume-io restart adjust attach wait-sync help" -f -a "resync" -d 'Start a resync with this node as the source'
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand help; and not __fish_seen_subcommand_from create-md dump-md check-config gen-secret status events primary secondary connect disconnect resync verify invalidate resume-io restart adjust attach wait-sync help" -f -a "verify" -d 'Online verify: compare every block with the peer'
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand help; and not __fish_seen_subcommand_from create-md dump-md check-config gen-secret status events primary secondary connect disconnect resync verify invalidate resume-io restart adjust attach wait-sync help" -f -a "invalidate" -d 'Discard this node\'s data and resync all of it from the peer'
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand help; and not __fish_seen_subcommand_from create-md dump-md check-config gen-secret status events primary secondary connect disconnect resync verify invalidate resume-io restart adjust attach wait-sync help" -f -a "resume-io" -d 'Lift a fencing freeze by hand (the fence-peer handler failed or hangs)'
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand help; and not __fish_seen_subcommand_from create-md dump-md check-config gen-secret status events primary secondary connect disconnect resync verify invalidate resume-io restart adjust attach wait-sync help" -f -a "restart" -d 'Restart mirrord in place, keeping its NBD clients connected'
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand help; and not __fish_seen_subcommand_from create-md dump-md check-config gen-secret status events primary secondary connect disconnect resync verify invalidate resume-io restart adjust attach wait-sync help" -f -a "adjust" -d 'Apply a changed config file to the running daemon, without a restart'
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand help; and not __fish_seen_subcommand_from create-md dump-md check-config gen-secret status events primary secondary connect disconnect resync verify invalidate resume-io restart adjust attach wait-sync help" -f -a "attach" -d 'Attach /dev/nbdN to the resource\'s export through the kernel\'s netlink interface'
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand help; and not __fish_seen_subcommand_from create-md dump-md check-config gen-secret status events primary secondary connect disconnect resync verify invalidate resume-io restart adjust attach wait-sync help" -f -a "wait-sync" -d 'Wait until connected and both disks are up to date'
complete -c mirrorctl -n "__fish_mirrorctl_using_subcommand help; and not __fish_seen_subcommand_from create-md dump-md check-config gen-secret status events primary secondary connect disconnect resync verify invalidate resume-io restart adjust attach wait-sync help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
