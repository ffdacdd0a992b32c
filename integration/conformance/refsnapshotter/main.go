// Command refsnapshotter serves containerd's own overlayfs snapshotter over the Snapshots
// gRPC API on a unix socket (contrib/snapshotservice), the way containerd documents proxy
// snapshotters. integration/bench_snapshotter.py measures this snapshotter against it.
//
//	refsnapshotter --root DIR --address SOCKET
package main

import (
	"flag"
	"log"
	"net"
	"os"
	"os/signal"
	"syscall"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/contrib/snapshotservice"
	"github.com/containerd/containerd/snapshots/overlay"
	"google.golang.org/grpc"
)

func main() {
	root := flag.String("root", "", "state directory")
	address := flag.String("address", "", "unix socket to listen on")
	flag.Parse()
	if *root == "" || *address == "" {
		log.Fatal("usage: refsnapshotter --root DIR --address SOCKET")
	}
	sn, err := overlay.NewSnapshotter(*root)
	if err != nil {
		log.Fatalf("overlay snapshotter: %v", err)
	}
	defer sn.Close()
	l, err := net.Listen("unix", *address)
	if err != nil {
		log.Fatalf("listen: %v", err)
	}
	srv := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(srv, snapshotservice.FromSnapshotter(sn))
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	go func() { <-sig; srv.GracefulStop() }()
	if err := srv.Serve(l); err != nil {
		log.Fatalf("serve: %v", err)
	}
}
