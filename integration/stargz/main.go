// Command stargz-snapshotter serves the peer stargz-snapshotter (library
// github.com/containerd/stargz-snapshotter 0.12, as packaged by Debian) as a
// containerd proxy snapshotter: the Snapshots gRPC API on a unix socket.
//
// Upstream's own daemon (containerd-stargz-grpc) is not packaged; this is a
// short equivalent for benchmarks. It leaves out the CRI and kubeconfig
// keychains (the CRI one needs k8s cri-api, which Debian lacks): only
// anonymous or loopback registries are reached.
//
//	stargz-snapshotter --root DIR --address SOCK [--config FILE]
//	                   [--plain-http HOST:PORT ...] [--log-level debug]
//
// --config is upstream's TOML config (service.Config: [blob], [fuse],
// noprefetch, no_background_fetch, [resolver.host."HOST".mirrors], ...).
// --plain-http HOST adds a mirror entry {host = HOST, insecure = true} so
// that registry is reached over plain HTTP. On SIGINT/SIGTERM the snapshotter
// unmounts every layer it mounted and exits.
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"

	"github.com/BurntSushi/toml"
	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/contrib/snapshotservice"
	"github.com/containerd/containerd/log"
	"github.com/containerd/stargz-snapshotter/service"
	"github.com/containerd/stargz-snapshotter/service/resolver"
	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
)

type hostList []string

func (h *hostList) String() string     { return strings.Join(*h, ",") }
func (h *hostList) Set(v string) error { *h = append(*h, v); return nil }

func main() {
	root := flag.String("root", "", "state directory (required)")
	address := flag.String("address", "", "unix socket to serve the Snapshots API on (required)")
	configPath := flag.String("config", "", "upstream stargz-snapshotter TOML config")
	logLevel := flag.String("log-level", "info", "logrus level")
	var plainHTTP hostList
	flag.Var(&plainHTTP, "plain-http", "registry HOST:PORT reached over plain HTTP (repeatable)")
	flag.Parse()
	if *root == "" || *address == "" || flag.NArg() != 0 {
		flag.Usage()
		os.Exit(2)
	}
	if err := run(*root, *address, *configPath, *logLevel, plainHTTP); err != nil {
		fmt.Fprintln(os.Stderr, "stargz-snapshotter:", err)
		os.Exit(1)
	}
}

func loadConfig(path string, plainHTTP []string) (*service.Config, error) {
	var cfg service.Config
	if path != "" {
		if _, err := toml.DecodeFile(path, &cfg); err != nil {
			return nil, fmt.Errorf("config %s: %w", path, err)
		}
	}
	if cfg.CRIKeychainConfig.EnableKeychain || cfg.KubeconfigKeychainConfig.EnableKeychain {
		return nil, fmt.Errorf("config %s: keychains are not built into this binary", path)
	}
	if len(plainHTTP) > 0 && cfg.ResolverConfig.Host == nil {
		cfg.ResolverConfig.Host = map[string]resolver.HostConfig{}
	}
	for _, h := range plainHTTP {
		hc := cfg.ResolverConfig.Host[h]
		hc.Mirrors = append(hc.Mirrors, resolver.MirrorConfig{Host: h, Insecure: true})
		cfg.ResolverConfig.Host[h] = hc
	}
	return &cfg, nil
}

func run(root, address, configPath, logLevel string, plainHTTP []string) error {
	lvl, err := logrus.ParseLevel(logLevel)
	if err != nil {
		return err
	}
	logrus.SetLevel(lvl)
	logrus.SetFormatter(&logrus.TextFormatter{FullTimestamp: true, TimestampFormat: log.RFC3339NanoFixed})
	ctx := log.WithLogger(context.Background(), log.L)

	cfg, err := loadConfig(configPath, plainHTTP)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(root, 0o700); err != nil {
		return err
	}
	sn, err := service.NewStargzSnapshotterService(ctx, root, cfg)
	if err != nil {
		return fmt.Errorf("snapshotter: %w", err)
	}
	defer func() {
		log.G(ctx).Info("closing the snapshotter (unmounting its layers)")
		if err := sn.Close(); err != nil {
			log.G(ctx).WithError(err).Warn("close")
		}
	}()

	if err := os.MkdirAll(filepath.Dir(address), 0o700); err != nil {
		return err
	}
	if err := os.Remove(address); err != nil && !os.IsNotExist(err) {
		return err
	}
	l, err := net.Listen("unix", address)
	if err != nil {
		return err
	}
	rpc := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(rpc, snapshotservice.FromSnapshotter(sn))

	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, unix.SIGINT, unix.SIGTERM)
	errc := make(chan error, 1)
	go func() { errc <- rpc.Serve(l) }()
	log.G(ctx).WithField("address", address).WithField("root", root).Info("serving")
	select {
	case s := <-sigs:
		log.G(ctx).Infof("got %v, stopping", s)
		rpc.Stop()
		return nil
	case err := <-errc:
		return err
	}
}
